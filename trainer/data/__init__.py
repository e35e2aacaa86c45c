"""Training data: the pretraining corpus in storage, its data loader, the tokenizer's training and evaluation."""
