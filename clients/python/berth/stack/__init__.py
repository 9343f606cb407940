"""`berth stack`: compose files deployed as labelled services, networks and secrets."""
