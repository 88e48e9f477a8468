// pagetwin: live migration of VMs whose disks sit on shared storage, sending
// RAM pages that are copies of disk blocks as references.
export * from "./core/index.js";
