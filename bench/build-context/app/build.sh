#!/bin/sh
# The second RUN step: index and checksum the generated files, stamp the version.
set -e
find data -type f | sort > index.txt
xargs md5sum < index.txt > checksums.md5
echo "version $(cat VERSION), $(wc -l < index.txt) files" > build-info.txt
