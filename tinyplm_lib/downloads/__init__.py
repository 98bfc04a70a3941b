"""Downloads: the raw cc100-ja and JaWiki files, fetched resumably from HTTP(S), S3 or a local path.

Sources behind one small interface, the part file that makes a download resumable, published
checksums, and the discovery of the newest JaWiki CirrusSearch dump.
"""
