"""Helpers that locate or build external tools lowbit verifies its outputs with (llama.cpp)."""
