module fdmoe.local/bindings/go

go 1.19
