"""Shoal's own iSCSI initiator: a sans-I/O core, an asyncio client, a block-device API."""
