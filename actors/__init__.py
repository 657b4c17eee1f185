"""Actors of the cer daemon: namespace factory, checkpoint extractor, pools and their supervisor."""
