"""pairmill: build filtered web image-pair corpora with Apache Beam."""

__version__ = "0.1.0"
