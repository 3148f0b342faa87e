"""The expert runtime every family shares: where expert records live (store: disk and the host tier;
tier: GPU slots; resident: every expert read where it lies), what stays (policy), and how a layer's
routed experts are computed (streamed: the CPU path; gpu_routed: the GPU path; cpu_share: the CPU
beside the GPU)."""
