"""The cluster service: nodes, placement, desired state, services, controller, events."""
