"""Test suite for minflux. It is a package so that `tests.tokenizer_files` and `tests.tiny_repo` import
under plain `pytest` too."""
