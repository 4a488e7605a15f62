//! PCI function of the vGPU: config space and MSI-X.
