"""Generated gRPC code for brainscan.v1 (run `make proto` after editing the .proto)."""
