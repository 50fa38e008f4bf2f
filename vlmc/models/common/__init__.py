"""Building blocks shared by the model families: decoder and ViT layers, the text config, image processors."""
