"""safeguard-bot: restores the safety of Hub fine-tunes by merging them with their base."""

__version__ = "0.1.0"
