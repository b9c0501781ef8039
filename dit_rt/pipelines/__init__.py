"""Family pipelines, one module per family. Each registers its classes with
`dit_rt.pipeline.register_pipeline` by the Hub `_class_name`; `dit_rt.pipeline.find_pipeline` imports every
module here on its first look-up, so a new family is a new file here and nothing else."""
