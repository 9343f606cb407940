"""berthd: the berth services (registry, image, builder, node, cluster)."""
