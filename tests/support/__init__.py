"""Test-support layer: offline image builder, real registry peer, skopeo wrappers, seeding."""
