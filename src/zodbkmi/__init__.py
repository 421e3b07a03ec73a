"""zodbkmi: transparent, authenticated encryption of ZODB data at rest."""
