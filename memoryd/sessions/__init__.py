"""The middle layer: the calls and their durability protocol; ordering, residency, leases, output policy."""
