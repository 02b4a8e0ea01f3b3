"""What the tests share and no test module owns: fakes for what the unit lane lacks (Triton,
NVML), processes (``flowserve serve``), small flows, PKI files and deploy builds. Test modules
import from here, never from each other."""
