#!/usr/bin/env bash
# Call 8: run6 (one-row GEMV with programmatic dependent launch) then run7 (ncu on the decode attention).
cd "$(dirname "$0")/.."
bash gpu/run6.sh
bash gpu/run7.sh
