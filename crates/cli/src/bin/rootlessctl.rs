//! `rootlessctl`: the client of RootlessKit's API; see [`rkport_cli::ctl`].

fn main() {
    std::process::exit(rkport_cli::ctl::ctl_main(std::env::args_os().collect()));
}
