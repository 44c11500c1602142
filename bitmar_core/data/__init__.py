"""Training and evaluation data: procedural captioned scenes (`scenes`), the offline text corpus
(`text`), the paper's formats for real data (`datasets`) and the training streams built from them
(`streams`)."""
