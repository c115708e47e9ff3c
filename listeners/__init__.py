"""Inbound webhook adapters: signature checks and payload to MappingRequest."""
