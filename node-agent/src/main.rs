mod dataplane;
mod model;
mod policy;

fn main() {}
