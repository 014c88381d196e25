"""The `kiln` command: run the mesh, one service, or the admin tools."""
