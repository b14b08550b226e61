"""One file per score; gqaprune.scoring.registry lists them."""
