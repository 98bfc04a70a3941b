"""Downloads: the raw cc100-ja and JaWiki files, fetched resumably from HTTP(S), S3 or a local path.

`download.download()` picks a `source.Source` by URL scheme (`http`, `s3`, `local`), fills the
resumable `partfile.PartFile` with retries and checks it against `checksums`; `dumps` finds the
newest complete JaWiki CirrusSearch dump.
"""
