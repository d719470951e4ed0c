"""Everything that crosses the wire between the encode and language services."""
