"""Training and evaluation data: procedural captioned scenes (`scenes`), the offline text corpus
(`text`), and the paper's formats for real data with the mixed sampler and collate (`datasets`)."""
