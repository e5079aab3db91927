"""Publishing: model cards and pull request texts (card.py), the results feed (feed.py).

Templates live in bot/templates/ so that they ship inside the package.
"""
