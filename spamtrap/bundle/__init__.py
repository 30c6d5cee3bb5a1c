"""Bundles: shard writers, the lifecycle, gzip mbox files, uploads and manifests."""
