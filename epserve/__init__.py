"""The `epserve` command line: thin wrappers over model_shards, cluster and replicas."""
