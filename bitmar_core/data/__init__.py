"""Training and evaluation data: procedural captioned scenes (`scenes`), the offline text corpus
(`text`), the paper's formats for real data (`datasets`), the training streams built from them
(`streams`) and backbone features computed once (`extract_features`)."""
