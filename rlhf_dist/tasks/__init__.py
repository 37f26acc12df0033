"""Built-in tasks: everything they need (tokenizer, models, data, reward) is built locally."""
