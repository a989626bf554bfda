"""In-Context LoRA (arXiv 2410.23775) on minflux: panel-set data, LoRA training and sampling."""
