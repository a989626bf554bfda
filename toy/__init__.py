"""A toy world for the whole IC-LoRA story on a laptop CPU: procedural scenes, exact captions, and scores.

`toy.world` draws scenes of 1-3 flat shapes on a 3x3 grid, writes their canonical captions, reads a (possibly
blurry, noisy, generated) image back into a scene, and scores how well an image follows a caption and how well
a two-panel image follows the toy IC-LoRA rule "recolour". `toy/make_sets.py` writes the datasets: joined
two-panel sets for IC-LoRA training, and single scenes for training a tiny base model.
"""
