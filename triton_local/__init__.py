"""Development tooling: a real Triton Inference Server on this machine over model_repository/
(`python -m triton_local`), for the Triton tests and benches. The production gateway never imports it;
in production Triton runs in its own container (docker/)."""
