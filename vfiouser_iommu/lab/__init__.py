"""The guest lab: QEMU, kernel, busybox, guest images, DTBs, qtest sessions."""
