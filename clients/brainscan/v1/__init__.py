"""Generated gRPC code for brainscan.v1 (run `python -m brainscan.protogen` after editing the .proto)."""
