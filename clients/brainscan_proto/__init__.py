"""The wire contract: Python code generated from proto/brainscan/v1/brainscan.proto.

Both sides import it: the gateway (servers) and the SDK (`brainscan`, clients);
neither imports the other. Regenerate with `make proto` after editing the .proto.
"""
