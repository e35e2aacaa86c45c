"""Evaluations of a model: bits per byte (loss), the CORE metric (core) and the chat tasks (chat)."""
