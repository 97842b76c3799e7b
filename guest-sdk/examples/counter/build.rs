fn main() {
    tt_guest_build::link();
}
