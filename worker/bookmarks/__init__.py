"""Bookmark imports: streaming parsers per format, URL canonicalisation, the importer."""
