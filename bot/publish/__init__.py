"""Publishing: model cards and pull request texts (card.py), the results feed (feed.py).

Templates live in templates/ at the top (the wheel carries them inside the package).
"""
