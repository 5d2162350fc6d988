"""Ray helpers: cluster start-up and placement groups."""
