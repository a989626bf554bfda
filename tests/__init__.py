"""Test suite for minflux; a package so that `tests.tokenizer_files` and `tests.tiny_repo` import under plain
`pytest` too."""
