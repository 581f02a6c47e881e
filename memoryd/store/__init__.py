"""Redis bytes: keys and layout, scripts, snapshots, the token log, leases (docs/service.md has the layout)."""
