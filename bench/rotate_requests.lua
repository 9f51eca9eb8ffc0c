-- wrk script: rotate through pre-signed requests read from a file of "path?query<TAB>body" lines.
local requests = {}
local counter = 0

function init(args)
  for line in io.lines(args[1]) do
    local path, body = line:match("([^\t]+)\t(.*)")
    requests[#requests + 1] = wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
  end
  counter = math.random(#requests)
end

function request()
  counter = counter % #requests + 1
  return requests[counter]
end
