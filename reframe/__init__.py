"""The application shell of Reframe Cluster: the `reframe` CLI, the demo and local process control."""
