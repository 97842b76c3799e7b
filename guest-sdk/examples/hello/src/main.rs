//! Prints a greeting and its arguments; `exit=N` makes it exit with N.
#![no_std]
#![no_main]

use tt_guest::println;

tt_guest::main!(app_main);

fn app_main() -> i32 {
    println!("Hello, world");
    let mut status = 0;
    for (i, arg) in tt_guest::boot::args().enumerate() {
        println!("arg[{}]: {}", i + 1, arg);
        if let Some(n) = arg.strip_prefix("exit=") {
            status = n.parse().unwrap_or(1);
        }
    }
    status
}
